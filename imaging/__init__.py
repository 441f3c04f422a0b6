"""productbg.imaging"""
