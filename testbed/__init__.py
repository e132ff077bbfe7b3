"""What the tests (tests/) and the benchmarks (bench/) both need, so that neither imports
the other: object stores on loopback and a fault-injecting relay (stores.py), the
cloudnbd command and servers run as a user runs them (served.py), a slow link (link.py),
process accounting (procs.py), a filesystem on an export (fs.py). Not installed with
cloudnbd."""
