"""The MoE data path as swappable stages: [Router] -> [Dispatch] -> [Experts] -> [Combine]."""
