"""Settings every test shares."""

import signal

# A shell starts background jobs with SIGINT ignored, and children inherit that: the tests of what Ctrl-C does
# (in this process and in the scripts they start) then see nothing. Tests run as if started in the foreground.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
