"""Pure-Python reference implementations of fastsock's compiled framer and ring.

They define the behaviour the compiled modules must match, and the tests use them as the
oracle.  fastsock uses them instead of the compiled modules only when the environment
variable ``FASTSOCK_PURE_PYTHON=1`` is set.
"""
