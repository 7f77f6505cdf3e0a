from esr.cli import main

raise SystemExit(main())
