"""The experiments' tests. The scripts in experiments/ are not a package: their tests import them by name
(``import calibrate_w2s``), as the scripts import one another, and take the tiny world of the library's tests
(tests/tiny_world.py, and tests/test_models.py's ``tiny_classifier``). Both folders go on the path here; the
library's tests (tests/) import nothing from experiments/."""

import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent.parent
for folder in (EXPERIMENTS.parent / "tests", EXPERIMENTS):          # experiments/ first
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
