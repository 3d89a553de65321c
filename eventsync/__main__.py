from eventsync.cli import main

raise SystemExit(main())
