"""``python -m se_inject`` runs the ``se-inject`` command."""

from se_inject.cli import main

main()
