"""`tally up`: a supervisor of processes, and the forwarding of its front process."""
