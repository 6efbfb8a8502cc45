"""meter.custody"""
