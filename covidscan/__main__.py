"""``python -m covidscan`` runs the command-line interface."""
from covidscan.cli import main

raise SystemExit(main())
