"""dllama-ctl: the command line people use."""
