"""The long profile of the differential fuzz test (tests/test_fuzz_rewrite.py).

    python tools/fuzz_rewrite.py            # 500 random programs
    python tools/fuzz_rewrite.py 2000
"""

import os
import pathlib
import subprocess
import sys

examples = sys.argv[1] if len(sys.argv) > 1 else "500"
root = pathlib.Path(__file__).resolve().parent.parent
env = dict(os.environ, CCE_FUZZ_EXAMPLES=examples)
sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-x",
                          str(root / "tests" / "test_fuzz_rewrite.py")], env=env))
