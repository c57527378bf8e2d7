"""Bench workload: print ``tick NNNNNN`` every 10 ms, COUNT times (the reconnect row's agent).

python3 -S ticker.py COUNT
"""

import os
import sys
import time


def main() -> int:
    for i in range(int(sys.argv[1])):
        os.write(1, b"tick %06d\n" % i)
        time.sleep(0.01)
    return 0


if __name__ == "__main__":
    sys.exit(main())
