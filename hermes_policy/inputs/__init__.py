"""What enters a stream: decoded video, annotation files, synthetic streams, and the
playback that feeds them to a session frame by frame with each question at its time."""
