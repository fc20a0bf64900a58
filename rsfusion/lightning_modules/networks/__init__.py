"""Pure nn.Module networks of the suite: no training logic here."""
