from ctsd.cli import main

main()
