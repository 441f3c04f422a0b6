"""productbg.training"""
