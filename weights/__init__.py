"""productbg.weights"""
