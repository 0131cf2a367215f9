"""ash-lightning's command line: ``python main.py test --config configs/cifar10_resnet20_ash_s.yaml``."""

import sys

from ash_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
