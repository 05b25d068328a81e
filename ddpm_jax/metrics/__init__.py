"""FID/IS evaluation: the FID Inception network (inception.py, preprocess.py), weight conversion
(convert_inception.py) and the statistics (fid.py)."""
