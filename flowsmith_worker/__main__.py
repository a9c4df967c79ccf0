"""`python -m flowsmith_worker` is `flowsmith`."""

from flowsmith_worker.cli.app import main

main()
