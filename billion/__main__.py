from billion.cli import main

main()
