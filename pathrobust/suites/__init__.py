"""Suite runners: one module per suite (plism, hest, eva) on the shared :mod:`base`."""
