"""Runs that outlive the terminal: flctl's supervisor for a detached run,
the systemd user unit used instead where that works, and whether a run's
processes are alive."""
