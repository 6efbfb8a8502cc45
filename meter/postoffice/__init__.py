"""meter.postoffice"""
