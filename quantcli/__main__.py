"""``python -m quantcli``."""

from quantcli.cli.app import main

main()
