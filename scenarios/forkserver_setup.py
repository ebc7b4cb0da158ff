"""Imported by the fork server of a run's workers (its preload, ``scenarios.workers._context``), nowhere else.

A service manager stops a service with SIGTERM to every process in it at once (systemd's
KillMode=control-group). The fork server would die of it on the spot, and its workers with it
(they end with their fork server: ``scenarios.workers._spare_main``) before the launcher had
them write their share of the record. So the fork server ignores SIGTERM, as multiprocessing
already has it ignore SIGINT; it still ends when its launcher does (its ``alive`` pipe closes).
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
