from mmchat.cli import main

main()
