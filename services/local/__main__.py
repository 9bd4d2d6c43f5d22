"""`python -m instgenie.services.local` = `instgenie up`."""
import sys

from .mesh import main

sys.exit(main())
