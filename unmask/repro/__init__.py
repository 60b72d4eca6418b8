"""Small-scale reproductions, one module per paper, and the demo. Built on the library; nothing in
the library imports them."""
