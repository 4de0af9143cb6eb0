"""Built-in factored Fisher rules; importing this package registers them."""
from fastewc.rules import dense  # noqa: F401
