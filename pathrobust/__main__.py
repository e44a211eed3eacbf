from pathrobust.cli import main

main()
