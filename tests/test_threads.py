"""thread_map: Python threads with one torch thread each."""

import torch

from dpbench.training.threads import thread_map


def test_thread_map_keeps_order_and_runs_serially_inside_itself():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        inner = []
        out = thread_map(lambda i: (inner.append(torch.get_num_threads()), i * i)[1], list(range(7)))
        assert out == [i * i for i in range(7)] and set(inner) == {1}  # one torch thread per worker
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
