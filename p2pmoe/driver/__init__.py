"""The round driver shared by the simulator and the daemon."""
