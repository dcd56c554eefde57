"""``python -m se_inject`` runs the ``se-inject`` command."""

from se_inject.cli.app import main

main()
