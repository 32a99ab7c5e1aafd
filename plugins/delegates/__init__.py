"""Built-in inference delegates."""
