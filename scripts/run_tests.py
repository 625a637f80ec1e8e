"""Run the test suite; pytest's exit code 5 (no tests collected) is a failure here, not a pass."""
import subprocess
import sys

code = subprocess.call([sys.executable, "-m", "pytest", "-q", *sys.argv[1:]])
if code == 5:
    print("run_tests: pytest collected no tests; that is an error", file=sys.stderr)
    code = 1
sys.exit(code)
