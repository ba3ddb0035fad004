"""socketforward's benchmarks: figures, never pass/fail on a time.

Run each from the repository root as a module (``make bench`` runs the first three):

    python3 -m uv run --locked --all-extras --group bench python -m bench.ttrpc_bench
    python3 -m uv run --locked --all-extras --group bench python -m bench.relay_bench
    python3 -m uv run --locked --all-extras --group bench python -m bench.forward_bench [--quick]
    python3 -m uv run --locked --all-extras python -m bench.conn_cost [--py-spy DIR]

* ``ttrpc_bench``: our asyncio ttrpc against containerd/ttrpc (Go), each way;
  writes bench/results/ttrpc.md.
* ``relay_bench``: the byte relay (splice, copy) against socat and a direct socket.
* ``forward_bench``: the whole forward path (``socketforward guest`` + ``host``)
  against nerdbox's Go path, socat and a direct socket; writes
  bench/results/latest.md and latest.png (and the README's table).
* ``conn_cost``: CPU microseconds per forwarded connection in each process.
* ``flood`` (``python -m bench.flood``): the host's RSS and fds under a hostile VM's floods.

Shared pieces: ``target`` (the service every path forwards to), ``loadgen``
(the load against it), ``goload`` (the same load and target in Go,
bench/go/cmd/sfload, forward_bench's default), ``processes`` (children and what they cost),
``stats`` (percentiles, median and min-max over rounds), ``markdown``
(report tables), ``machine`` (what the run ran on), ``event_loop``.
"""
