"""The web pages: the chat playground that `lmforge serve` shows at / and the run dashboard of `lmforge dashboard`.
Plain HTML, CSS and JavaScript modules in static/, served by assets.py with a strict Content-Security-Policy."""
