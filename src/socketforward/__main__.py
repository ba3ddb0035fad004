from socketforward.cli import main

raise SystemExit(main())
