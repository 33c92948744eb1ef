import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# One intra-op thread: the models in tests are tiny, so a second thread buys little, and on a
# loaded 2-core machine an OpenMP team whose second thread is descheduled can make a test 50x slower.
torch.set_num_threads(1)
