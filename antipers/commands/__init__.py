"""The ``antipers`` commands' implementations, one module per area, so that each stays
small; ``antipers.cli`` declares the arguments and dispatches to them."""
