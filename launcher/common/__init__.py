"""The shared base of the launcher: typed errors, atomic files, untrusted input, the console,
home paths, the job spec (config) and the Docker connection. Imports no other launcher package."""
