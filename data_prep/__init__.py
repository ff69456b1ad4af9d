"""Data preparation: decoding, face crops, editing fakes and the demo data set."""
