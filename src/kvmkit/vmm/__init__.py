"""The VMM: machine configuration, building a VM from it, vCPU threads, the console."""
