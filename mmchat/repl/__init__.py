"""The interactive chat (``mmchat run``): inline image paths, slash commands, streaming output."""
