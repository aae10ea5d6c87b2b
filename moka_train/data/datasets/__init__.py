"""Dataset builders: one module per dataset, each turning the published files into Records."""
