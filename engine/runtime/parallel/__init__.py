"""One request across several ranks (GPUs of one host, or CPU processes over gloo): the split
(layout.py), one rank's part (rank.py), the collectives (comm.py), the rank-0 session and the
workers' loop (session.py), the launcher (launch.py), and one rank's step measured alone on one
GPU (simulate.py). README "Several GPUs" explains the layout."""
