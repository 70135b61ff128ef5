from slipstream.bench import main

raise SystemExit(main())
