"""productbg.pipeline"""
