"""``python -m quantcli``."""

from quantcli.cli import main

main()
