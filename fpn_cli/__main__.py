from fpn_cli.console import main

main()
