"""The control plane: config, table publishing, worker-pool lifecycle, clean shutdown."""
